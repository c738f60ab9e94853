-- Versions of each model (0 is the base weights and has no row), their aliases, the jobs that make
-- versions and statistics, and the statistics themselves. Changes live in the blob store as safetensors.
CREATE TABLE versions (
    model         TEXT NOT NULL,
    number        INTEGER NOT NULL CHECK (number > 0),
    parent        INTEGER NOT NULL,
    -- pending, ready, failed or deleted; a deleted version keeps its row so that its number is never reused.
    state         TEXT NOT NULL,
    layer         TEXT NOT NULL,
    method        TEXT NOT NULL,
    solver        TEXT NOT NULL,
    -- rank, steps, lr, seed, as JSON.
    parameters    TEXT NOT NULL,
    statistics    TEXT,
    description   TEXT,
    metrics       TEXT,
    error         TEXT,
    job           TEXT NOT NULL,
    delta_blob    TEXT,
    stored_bytes  INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    ready_at      TEXT,
    PRIMARY KEY (model, number)
);

CREATE TABLE version_exemplars (
    model     TEXT NOT NULL,
    number    INTEGER NOT NULL,
    position  INTEGER NOT NULL,
    exemplar  TEXT NOT NULL REFERENCES exemplars (id),
    PRIMARY KEY (model, number, position),
    FOREIGN KEY (model, number) REFERENCES versions (model, number)
);
CREATE INDEX version_exemplars_exemplar ON version_exemplars (exemplar);

-- Custom aliases and `default`; `base` and `latest` are computed.
CREATE TABLE aliases (
    model       TEXT NOT NULL,
    alias       TEXT NOT NULL,
    number      INTEGER NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (model, alias)
);

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    model            TEXT NOT NULL,
    -- queued, running, succeeded, failed or cancelled.
    state            TEXT NOT NULL,
    version          INTEGER,
    statistics       TEXT,
    -- The request as the job runs it, as JSON.
    request          TEXT NOT NULL,
    idempotency_key  TEXT UNIQUE,
    -- sha256 of the model and request the key was first used with.
    request_sha256   TEXT NOT NULL,
    step             INTEGER NOT NULL DEFAULT 0,
    total            INTEGER NOT NULL DEFAULT 0,
    loss             REAL,
    error            TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);

CREATE TABLE statistics (
    id          TEXT PRIMARY KEY,
    model       TEXT NOT NULL,
    layer       TEXT NOT NULL,
    blob        TEXT NOT NULL,
    images      INTEGER NOT NULL,
    positions   INTEGER NOT NULL,
    created_at  TEXT NOT NULL
);
