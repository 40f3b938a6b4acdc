-- The raw engine's equivalent of a claim, for pgbench: one row of the records table's shape
-- (a fresh random 32-byte id, times from the server's clock) inserted if absent, in one
-- autocommitted statement.
INSERT INTO raw_claims
    (id, fingerprint, token, state, lease_until, retention, expires_at, holder)
SELECT sha256(random()::text::bytea || clock_timestamp()::text::bytea),
       '\x6265e2e24545c5e05e5e8e5c0bd9e6a3a49b5b8c7f2f1d0e0c0b0a0908070605'::bytea,
       c.now * 1000, 0, c.now + 60000, 60000, c.now + 120000,
       '\x00112233445566778899aabbccddeeff'::bytea
FROM (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now) c
ON CONFLICT (id) DO NOTHING;
