-- Instants leave the database as whole microseconds since the Unix epoch
-- (int8): PostgreSQL's own precision, which a JS Date (milliseconds) would
-- lose. This function is the one place that conversion is written; it is
-- plain SQL, so the planner inlines it. (The other way, parameters are sent
-- as whole seconds plus microseconds: src/db/time.ts.)
--
-- extract(epoch ...) is an exact numeric since PostgreSQL 14; null stays null.
create function epoch_micros(at timestamptz) returns int8
language sql stable parallel safe
return (extract(epoch from at) * 1000000)::int8;
