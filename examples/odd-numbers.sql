-- The table of examples/odd-numbers.yaml: 100,000 numbers to tell odd from even, and the columns
-- the postgres source writes each row's claim and outcome in (its default names).
--   psql "$DATABASE_URL" -f examples/odd-numbers.sql
DROP TABLE IF EXISTS numbers;
CREATE TABLE numbers (
    value             bigint PRIMARY KEY,
    is_odd            boolean,
    reservation_id    text,
    reservation_time  timestamptz,
    reservation_times int,
    start_time        timestamptz,
    end_time          timestamptz,
    success           boolean,
    error_description text
);
INSERT INTO numbers (value) SELECT generate_series(1, 100000);
-- The rows still to do, in key order: a claim reads these rather than every finished row before
-- them (without it each claim walks the primary key from the start, and a big table slows down as
-- it is done). Any table the source claims from wants one like it on its key.
CREATE INDEX numbers_unfinished ON numbers (value) WHERE success IS NULL;
