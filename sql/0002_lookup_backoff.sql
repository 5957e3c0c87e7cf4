-- fdqueue 0002: marker look-ups that keep failing (Freshdesk down) back off like sends do.
-- Counts consecutive failed look-ups of a maybe-sent row; any other outcome resets it.
ALTER TABLE freshdesk_ticket_queue
    ADD COLUMN IF NOT EXISTS lookup_failures INTEGER NOT NULL DEFAULT 0;
