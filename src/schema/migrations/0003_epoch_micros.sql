-- Instants leave the database as whole microseconds since the Unix epoch
-- (int8): PostgreSQL's own precision, which a JS Date (milliseconds) would
-- lose. This function is the one place that conversion is written; it is
-- plain SQL, so the planner inlines it. (The other way, parameters are sent
-- as whole seconds plus microseconds: src/db/time.ts.)
--
-- extract(epoch ...) is an exact numeric since PostgreSQL 14; null stays null.
--
-- A column may hold what a protobuf Timestamp cannot (0001-01-01 to
-- 9999-12-31): 'infinity', '-infinity', a year after 9999 or before 1,
-- written by someone else's SQL. Such an instant is given as the nearest
-- one a Timestamp can carry, so that one odd row cannot fail a read (or the
-- feed of changes) for everyone: 'infinity' reads as the last microsecond
-- of 9999, '-infinity' as the first of year 1.
create function epoch_micros(at timestamptz) returns int8
language sql stable parallel safe
return (extract(epoch from case
  when at < timestamptz '0001-01-01 00:00:00+00' then timestamptz '0001-01-01 00:00:00+00'
  when at > timestamptz '9999-12-31 23:59:59.999999+00' then timestamptz '9999-12-31 23:59:59.999999+00'
  else at
end) * 1000000)::int8;
