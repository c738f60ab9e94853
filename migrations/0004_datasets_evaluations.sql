-- Datasets (labelled images, unlabelled images, or original/transformed pairs) and the evaluations that
-- score versions on them. Images live in the blob store as uploaded; rows hold their sha256.
CREATE TABLE datasets (
    id          TEXT PRIMARY KEY,
    name        TEXT,
    -- labelled, pairs or unlabelled.
    kind        TEXT NOT NULL,
    -- Items: images, or pairs for a pairs dataset.
    images      INTEGER NOT NULL,
    -- Distinct labels (0 when unlabelled).
    classes     INTEGER NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE dataset_items (
    dataset           TEXT NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    position          INTEGER NOT NULL,
    -- The image, or a pair's original.
    image_blob        TEXT NOT NULL,
    transformed_blob  TEXT,
    label             INTEGER,
    PRIMARY KEY (dataset, position)
);

-- No reference to datasets: an evaluation keeps its results after its dataset is deleted.
CREATE TABLE evaluations (
    id                TEXT PRIMARY KEY,
    model             TEXT NOT NULL,
    job               TEXT NOT NULL REFERENCES jobs (id),
    dataset           TEXT NOT NULL,
    baseline          INTEGER NOT NULL,
    -- Version numbers, as a JSON array.
    versions          TEXT NOT NULL,
    -- Classes left out of the scores, as a JSON array: those asked for, then (once finished) also the
    -- exemplars' classes.
    excluded_classes  TEXT NOT NULL,
    -- pending, succeeded, failed or cancelled.
    state             TEXT NOT NULL,
    -- The scores, as JSON, once succeeded.
    result            TEXT,
    error             TEXT,
    created_at        TEXT NOT NULL,
    finished_at       TEXT
);
CREATE INDEX evaluations_model ON evaluations (model);
CREATE INDEX evaluations_job ON evaluations (job);
