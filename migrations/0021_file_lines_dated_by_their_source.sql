-- File lines dated by their source.
--
-- Since 0017 a file line (no send time) was dated the day it was ingested, so a replay on a
-- later day dated it again, differently: the writer looked such lines up in every month, and
-- held `undated_gate` while it did, so that two replays could not both miss each other. That
-- lock made a file's writers take turns: `cargo bench --bench pipeline` stored 35,613 lines/s
-- with it and 56,077 without it, on the same machine.
--
-- A file's lines are now dated the day their source was first ingested: `file_sources` keeps
-- that day for each source, under the key of its source id (the id every line's message id is
-- made from, so the id a replay must repeat anyway). Every replay of a source dates its lines
-- the same day, as every redelivery of an SQS message repeats its send time: a replay meets
-- its earlier rows in that day's month, and two replays at once meet at the unique index (one
-- of them is `Raced` and writes again). No lock is taken, and no other month is looked in.
--
-- Lines stored before this migration were dated on the days they were ingested, in any month
-- up to today. `lines_dated_when_ingested.through` is today if any login is stored (NULL in an
-- empty database), and the writer also looks a file's lines up in the months up to that day;
-- the look-up reads no such month once they have expired, and none at all in a database that
-- had no logins.
--
-- `undated_gate` is no longer taken; it stays for ingesters of the previous release, which
-- take it, until a later migration drops it. Let those finish their file ingests before this
-- migration runs: they date lines the day they ingest them.

CREATE TABLE file_sources (
    source_key uuid PRIMARY KEY,
    first_day date NOT NULL
);
COMMENT ON TABLE file_sources IS
    'the day each file source was first ingested, the day its lines are dated (migration 0021)';
COMMENT ON COLUMN file_sources.source_key IS
    'message_key(source id): the source id itself, often a path, is not kept';
GRANT SELECT, INSERT ON file_sources TO pii_vault_ingester;

CREATE TABLE lines_dated_when_ingested (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    through date
);
COMMENT ON TABLE lines_dated_when_ingested IS
    'file lines stored before migration 0021 were dated when ingested, up to this day';
INSERT INTO lines_dated_when_ingested (through)
SELECT (now() AT TIME ZONE 'UTC')::date WHERE EXISTS (SELECT 1 FROM user_logins);
INSERT INTO lines_dated_when_ingested (through)
SELECT NULL WHERE NOT EXISTS (SELECT 1 FROM lines_dated_when_ingested);
GRANT SELECT ON lines_dated_when_ingested TO pii_vault_ingester;

COMMENT ON TABLE undated_gate IS
    'no longer taken since migration 0021; kept for ingesters of the previous release';
