-- The weights each model name's versions were made on: a version's change only means something on them.
CREATE TABLE model_bases (
    model           TEXT PRIMARY KEY,
    weights_sha256  TEXT NOT NULL,
    recorded_at     TEXT NOT NULL
);
