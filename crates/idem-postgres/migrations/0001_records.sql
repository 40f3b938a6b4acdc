-- Records: one row per record id. Times are milliseconds since the Unix epoch, always
-- taken from the server's clock. state: 0 in flight, 1 completed, 2 released (tombstone).
CREATE TABLE IF NOT EXISTS {{table}} (
    id                     BYTEA    PRIMARY KEY,
    fingerprint            BYTEA    NOT NULL,
    token                  BIGINT   NOT NULL,
    state                  SMALLINT NOT NULL,
    lease_until            BIGINT   NOT NULL,
    retention              BIGINT   NOT NULL,
    expires_at             BIGINT   NOT NULL,
    settled_at             BIGINT,
    response               BYTEA,
    -- The random nonce of the claim that wrote the row, to resolve a claim whose answer
    -- was lost with its connection.
    holder                 BYTEA,
    -- Set when the claim took over a lease that had passed.
    taken_over_token       BIGINT,
    taken_over_lease_until BIGINT
);

CREATE INDEX IF NOT EXISTS {{index_prefix}}_expires_at ON {{table}} (expires_at);
