-- Exemplars (an image, its concept mask and a modified copy), textures for transforms, and the audit log.
-- Pixels live in the content-addressed blob store; rows hold their sha256.
CREATE TABLE textures (
    id          TEXT PRIMARY KEY,
    image_blob  TEXT NOT NULL,
    width       INTEGER NOT NULL,
    height      INTEGER NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE exemplars (
    id             TEXT PRIMARY KEY,
    image_blob     TEXT NOT NULL,
    mask_blob      TEXT NOT NULL,
    modified_blob  TEXT NOT NULL,
    width          INTEGER NOT NULL,
    height         INTEGER NOT NULL,
    mask_fraction  REAL NOT NULL,
    -- The transform that made the modified image, as JSON, when the server made it.
    transform      TEXT,
    created_at     TEXT NOT NULL
);

CREATE TABLE audit (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at       TEXT NOT NULL,
    action   TEXT NOT NULL,
    subject  TEXT NOT NULL,
    caller   TEXT NOT NULL,
    detail   TEXT
);
CREATE INDEX audit_at ON audit (at);
