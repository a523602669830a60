#!/usr/bin/env bash
# Lints the SQL that is installed in the database, sql/**/*.sql, with squawk
# (SQUAWK=path to its binary; `make lint` installs it). Rules left out, and
# why: .squawk.toml.
#
# squawk parses SQL, not psql scripts, so each file is fed to it with the psql
# parts neutralized, line numbers kept: meta-command lines (\set, \if, \ir, \o,
# ...) become empty lines, a trailing \g becomes the ';' it stands for, and
# psql variables :'name' and :"name" become the literal or identifier 'name'
# and "name".
set -euo pipefail
cd "$(dirname "$0")/.."
squawk=${SQUAWK:?set SQUAWK to the squawk binary (make lint does)}

mapfile -d '' files < <(find sql -name '*.sql' -print0 | sort -z)
if [ ${#files[@]} -eq 0 ]; then
  echo "lint-sql: no sql/**/*.sql files" >&2
  exit 1
fi
rc=0
for f in "${files[@]}"; do
  # The gcc reporter of squawk 2.66 counts lines and columns from 0: add 1.
  sed -E \
    -e 's/^[[:space:]]*\\.*$//' \
    -e 's/[[:space:]]+\\g(set|exec)?([[:space:]].*)?$/;/' \
    -e "s/:'([A-Za-z_][A-Za-z0-9_]*)'/'\\1'/g" \
    -e 's/:"([A-Za-z_][A-Za-z0-9_]*)"/"\1"/g' \
    "$f" |
    "$squawk" --config .squawk.toml --reporter gcc --stdin-filepath "$f" |
    awk -F: -v OFS=: '$2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ { $2++; $3++ } { print }' ||
    rc=1
done
if [ $rc -eq 0 ]; then
  echo "squawk: ${#files[@]} SQL files, no issues"
fi
exit $rc
