package testkit

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Sample is one sample line of a Prometheus text exposition.
type Sample struct {
	Name   string
	Labels map[string]string
	Value  float64
}

// ParseExposition reads the samples of a Prometheus text exposition (format
// 0.0.4): comments and blank lines skipped, label values unescaped, an
// optional timestamp after the value ignored.
func ParseExposition(text string) ([]Sample, error) {
	var out []Sample
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		s := Sample{Labels: map[string]string{}}
		rest := line
		if i := strings.IndexAny(line, "{ \t"); i < 0 {
			return nil, fmt.Errorf("sample without a value: %q", line)
		} else {
			s.Name, rest = line[:i], line[i:]
		}
		if strings.HasPrefix(rest, "{") {
			var err error
			if rest, err = parseLabels(rest[1:], s.Labels); err != nil {
				return nil, fmt.Errorf("sample %q: %w", line, err)
			}
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return nil, fmt.Errorf("sample without a value: %q", line)
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return nil, fmt.Errorf("sample %q: %w", line, err)
		}
		s.Value = v
		out = append(out, s)
	}
	return out, nil
}

// parseLabels reads `name="value",...}` into labels and returns what
// follows the closing brace.
func parseLabels(text string, labels map[string]string) (string, error) {
	for {
		text = strings.TrimLeft(text, " \t,")
		if strings.HasPrefix(text, "}") {
			return text[1:], nil
		}
		eq := strings.IndexByte(text, '=')
		if eq <= 0 || len(text) < eq+2 || text[eq+1] != '"' {
			return "", errors.New("malformed label")
		}
		name := strings.TrimSpace(text[:eq])
		var value strings.Builder
		i := eq + 2
		for ; i < len(text) && text[i] != '"'; i++ {
			c := text[i]
			if c == '\\' && i+1 < len(text) {
				i++
				switch text[i] {
				case 'n':
					c = '\n'
				default: // \\ and \"
					c = text[i]
				}
			}
			value.WriteByte(c)
		}
		if i >= len(text) {
			return "", errors.New("unterminated label value")
		}
		labels[name] = value.String()
		text = text[i+1:]
	}
}

// Scrape GETs a /metrics page (url with its scheme and path) and parses it.
// A status other than 200 is an error.
func Scrape(url string) ([]Sample, error) {
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return ParseExposition(string(body))
}

// Named returns the samples called name.
func Named(samples []Sample, name string) []Sample {
	var out []Sample
	for _, s := range samples {
		if s.Name == name {
			out = append(out, s)
		}
	}
	return out
}

// Total is the sum of the samples called name (0 if there are none).
func Total(samples []Sample, name string) float64 {
	var t float64
	for _, s := range Named(samples, name) {
		t += s.Value
	}
	return t
}
