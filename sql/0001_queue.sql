-- fdqueue 0001: the ticket queue.
-- Keeps every column of the original freshdesk_ticket_queue with its meaning, so the
-- original manual-recovery SQL keeps working, and adds what safe delivery needs.
-- Safe to run twice: every object is created only when missing.

CREATE TABLE IF NOT EXISTS freshdesk_ticket_queue (
    id                  BIGSERIAL PRIMARY KEY,
    ticket_data         JSONB NOT NULL,
    status              VARCHAR(50) NOT NULL DEFAULT 'pending',
    attempts            INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL DEFAULT 3,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    processed_at        TIMESTAMPTZ,
    next_attempt_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    error_message       TEXT,
    freshdesk_ticket_id VARCHAR(255),
    chatbot_id          VARCHAR(255),
    user_id             VARCHAR(255),
    -- Additions.
    public_id           UUID NOT NULL DEFAULT gen_random_uuid(),
    idempotency_key     TEXT,
    locked_until        TIMESTAMPTZ,
    locked_by           TEXT,
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_http_status    INTEGER,
    -- The last send may have created the ticket (timeout, reset, 5xx, dead worker):
    -- the next try looks it up by its marker before sending again.
    outcome_unknown     BOOLEAN NOT NULL DEFAULT false,
    CONSTRAINT freshdesk_ticket_queue_status_check
        CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    CONSTRAINT freshdesk_ticket_queue_attempts_check
        CHECK (attempts >= 0 AND max_attempts >= 1)
);

CREATE UNIQUE INDEX IF NOT EXISTS freshdesk_ticket_queue_public_id_key
    ON freshdesk_ticket_queue (public_id);

CREATE UNIQUE INDEX IF NOT EXISTS freshdesk_ticket_queue_idempotency_key
    ON freshdesk_ticket_queue (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- The claim reads due pending rows in next_attempt_at order; a partial index stays small
-- however many completed rows the table holds.
CREATE INDEX IF NOT EXISTS freshdesk_ticket_queue_due
    ON freshdesk_ticket_queue (next_attempt_at, id) WHERE status = 'pending';

-- Expired leases of dead workers.
CREATE INDEX IF NOT EXISTS freshdesk_ticket_queue_leases
    ON freshdesk_ticket_queue (locked_until) WHERE status = 'processing';

-- Retention cleanup of final rows.
CREATE INDEX IF NOT EXISTS freshdesk_ticket_queue_final
    ON freshdesk_ticket_queue (processed_at) WHERE status IN ('completed', 'failed');

-- A high-churn queue table: vacuum it long before the default 20 % of dead rows.
ALTER TABLE freshdesk_ticket_queue SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02
);

-- Wake the workers when a row becomes due. NOTIFY is only a hint (the workers re-read the
-- table), so the payload is empty; PostgreSQL folds identical notifications of one
-- transaction into one, so a batch insert or a bulk UPDATE wakes each listener once.
CREATE OR REPLACE FUNCTION fdqueue_notify_due() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fdqueue_due', '');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS fdqueue_notify_insert ON freshdesk_ticket_queue;
CREATE TRIGGER fdqueue_notify_insert
    AFTER INSERT ON freshdesk_ticket_queue
    FOR EACH STATEMENT EXECUTE FUNCTION fdqueue_notify_due();

-- Rows set back to pending and due now: the original manual-recovery UPDATE, retry-failed.
-- Retries scheduled in the future do not notify: the worker's timer is set to the next due row.
DROP TRIGGER IF EXISTS fdqueue_notify_pending ON freshdesk_ticket_queue;
CREATE TRIGGER fdqueue_notify_pending
    AFTER UPDATE OF status ON freshdesk_ticket_queue
    FOR EACH ROW
    WHEN (NEW.status = 'pending' AND OLD.status IS DISTINCT FROM 'pending'
          AND NEW.next_attempt_at <= now())
    EXECUTE FUNCTION fdqueue_notify_due();
