#!/usr/bin/env bash
# First start of the compose `postgres` container: the roles and the database of pii-vault, as
# `scripts/services up` makes them on a local server, so that nothing runs as a superuser:
#
#   pii_vault            owns the database and the schema; not a superuser, no CREATEROLE, not
#                        the door: `rotate-keys init` runs as it
#   pii_vault_roleadmin  the role administrator (CREATEROLE): lends the owner the door role for
#                        a migration window (ROLE_ADMIN_DATABASE_URL of `init`)
#   ingester, analyst, compliance, keyadmin
#                        logins in the group roles pii_vault_ingester, _analyst, _compliance,
#                        _keyadmin that the migrations grant privileges to; `nobody` has none
#
# Passwords are the role names, as locally: the compose network is the only way in, and the
# DATABASE_URLs in docker-compose.yaml spell them out.
#
# The postgres image runs every executable *.sh in /docker-entrypoint-initdb.d once, on an empty
# volume, as the image's superuser (POSTGRES_USER) over the socket of a server listening on no
# TCP port; scripts/check-compose runs this file the same way against a scratch cluster.
set -euo pipefail

psql -X -q -v ON_ERROR_STOP=1 --no-password --username "$POSTGRES_USER" \
    --dbname "${POSTGRES_DB:-$POSTGRES_USER}" <<'SQL'
-- NOCREATEROLE, and no membership in pii_vault_door: with either the owner could make itself
-- the door and rewrite the audit's trigger functions (SECURITY.md S7).
CREATE ROLE pii_vault LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD 'pii_vault';
-- RDS's master user plays this part in production.
CREATE ROLE pii_vault_roleadmin LOGIN NOSUPERUSER NOCREATEDB CREATEROLE PASSWORD 'pii_vault_roleadmin';

-- The migrations create these too; made here first so that the logins can be granted them.
CREATE ROLE pii_vault_ingester NOLOGIN;
CREATE ROLE pii_vault_analyst NOLOGIN;
CREATE ROLE pii_vault_compliance NOLOGIN;
CREATE ROLE pii_vault_keyadmin NOLOGIN;
CREATE ROLE pii_vault_door NOLOGIN;

CREATE ROLE ingester LOGIN PASSWORD 'ingester' IN ROLE pii_vault_ingester;
CREATE ROLE analyst LOGIN PASSWORD 'analyst' IN ROLE pii_vault_analyst;
CREATE ROLE compliance LOGIN PASSWORD 'compliance' IN ROLE pii_vault_compliance;
CREATE ROLE keyadmin LOGIN PASSWORD 'keyadmin' IN ROLE pii_vault_keyadmin;
CREATE ROLE nobody LOGIN PASSWORD 'nobody';

CREATE DATABASE pii_vault OWNER pii_vault;
SQL
