-- Trace context across the event: a producer may record the W3C `traceparent` of its span with
-- the event (NULL when it records none, as in every row written before this migration); the
-- readers hand it to subscribers as the event's typed trace context.
ALTER TABLE ff_completion_event ADD COLUMN traceparent TEXT;
