#!/usr/bin/env bash
# First start of the compose `postgres` container: the image's superuser may log in over the
# container's own Unix socket only (`docker compose exec postgres psql -U postgres`), never over
# the network, so no other container can use it to bypass the roles of 10-pii-vault-roles.sh.
#
# pg_hba.conf takes the first line that matches: this one goes above the image's
# `host all all all scram-sha-256`. The server of the first start reads it when it restarts,
# right after these scripts.
set -euo pipefail

hba=$PGDATA/pg_hba.conf
sed -i "1i host all $POSTGRES_USER all reject" "$hba"
printf '20-superuser-socket-only.sh: %s over TCP is refused (%s)\n' "$POSTGRES_USER" "$hba"
