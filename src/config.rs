//! Server configuration: flags, each with an `EDITSERVE_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::core::scheduler::BatchingConfig;
use crate::imaging::DecodeLimits;

// Request limits' defaults, named so that the OpenAPI document states the same numbers.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;
pub const DEFAULT_MAX_IMAGES_PER_REQUEST: usize = 64;
pub const DEFAULT_MAX_REQUEST_PIXELS: u64 = 100_000_000;
pub const DEFAULT_MAX_IMAGES_IN_FLIGHT: usize = 512;
pub const DEFAULT_MAX_DATASET_IMAGES: usize = 5000;
pub const DEFAULT_MAX_DATASET_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("device must be auto, cpu, cuda or cuda:N, got '{other}'")),
        }
    }
}

impl DeviceChoice {
    pub fn resolve(self) -> Result<tch::Device, String> {
        match self {
            Self::Cpu => Ok(tch::Device::Cpu),
            Self::Auto => Ok(tch::Device::cuda_if_available()),
            Self::Cuda(i) if tch::Cuda::is_available() && i < tch::Cuda::device_count() as usize => {
                Ok(tch::Device::Cuda(i))
            }
            Self::Cuda(i) => {
                Err(format!("cuda:{i} requested but {} CUDA devices are available", tch::Cuda::device_count()))
            }
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "EDITSERVE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory of model packages (one subdirectory each, with config.json and model.safetensors).
    #[arg(long, env = "EDITSERVE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Where the database (editserve.db) and blobs (exemplar images, deltas) live.
    #[arg(long, env = "EDITSERVE_DATA_DIR", default_value = "var")]
    pub data_dir: PathBuf,
    /// Load only these packages of the models directory (comma-separated names); all when empty.
    #[arg(long, env = "EDITSERVE_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// auto, cpu, cuda or cuda:N. auto takes the first GPU when there is one.
    #[arg(long, env = "EDITSERVE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// Most images per forward pass [default: 2 on CPU, where a pass on one thread gains nothing from
    /// larger batches and small ones spread over the executors (README, "Throughput"); 64 on CUDA].
    #[arg(long, env = "EDITSERVE_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Forward passes that run at once, each on its own executor thread [default: on CPU one per core,
    /// each with one libtorch thread (README, "Throughput"); 1 on CUDA].
    #[arg(long, env = "EDITSERVE_INFERENCE_STREAMS")]
    pub inference_streams: Option<std::num::NonZeroUsize>,
    /// libtorch threads of each forward pass [default: 1 on CPU; libtorch's own choice on CUDA].
    #[arg(long, env = "EDITSERVE_INFERENCE_THREADS")]
    pub inference_threads: Option<std::num::NonZeroUsize>,
    /// Longest a batch is held open for requests that are still being decoded, in milliseconds. A batch
    /// never waits when no other request is on its way.
    #[arg(long, env = "EDITSERVE_MAX_BATCH_WAIT_MS", default_value_t = 20)]
    pub max_batch_wait_ms: u64,
    /// Requests that may wait for the device; beyond that the server answers 503 with Retry-After.
    #[arg(long, env = "EDITSERVE_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "EDITSERVE_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Largest accepted image, in pixels (width x height, read from the header before decoding).
    #[arg(long, env = "EDITSERVE_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Seconds a client has to send a request's head (also between requests on a kept-alive connection);
    /// a connection that sends nothing, or too slowly, is closed.
    #[arg(long, env = "EDITSERVE_HEADER_TIMEOUT_SECS", default_value_t = 30)]
    pub header_timeout_secs: u64,
    /// Seconds a request may take, reading its body included, before it is answered 504 `deadline_exceeded`
    /// (an event stream counts only until its first event).
    #[arg(long, env = "EDITSERVE_REQUEST_TIMEOUT_SECS", default_value_t = 120)]
    pub request_timeout_secs: u64,
    /// Most images one classification or comparison request may carry.
    #[arg(long, env = "EDITSERVE_MAX_IMAGES_PER_REQUEST", default_value_t = DEFAULT_MAX_IMAGES_PER_REQUEST)]
    pub max_images_per_request: usize,
    /// Most pixels (width x height, from the headers) of all the images of one such request together: what
    /// bounds the memory a request can make the server decode into.
    #[arg(long, env = "EDITSERVE_MAX_REQUEST_PIXELS", default_value_t = DEFAULT_MAX_REQUEST_PIXELS)]
    pub max_request_pixels: u64,
    /// Most images the server holds decoded at once, over every classification in flight (a request waits
    /// for room before decoding): what bounds memory under many concurrent requests (about 0.6 MB per image
    /// at 224 x 224). At least --max-images-per-request.
    #[arg(long, env = "EDITSERVE_MAX_IMAGES_IN_FLIGHT", default_value_t = DEFAULT_MAX_IMAGES_IN_FLIGHT)]
    pub max_images_in_flight: usize,
    /// Materialised versions kept on the device beside the base weights; the least recently used leave.
    #[arg(long, env = "EDITSERVE_MAX_RESIDENT_VERSIONS", default_value_t = std::num::NonZeroUsize::new(4).unwrap_or(std::num::NonZeroUsize::MIN))]
    pub max_resident_versions: std::num::NonZeroUsize,
    /// Edit and statistics jobs that may wait while one runs; beyond that, 503 with Retry-After.
    #[arg(long, env = "EDITSERVE_EDIT_QUEUE_CAPACITY", default_value_t = 16)]
    pub edit_queue_capacity: usize,
    /// libtorch threads an edit job computes with. Each OpenMP team beyond the inference worker's, once the
    /// teams' threads outnumber the cores, makes OpenMP stop spinning between operations for every team,
    /// which slowed both edits and classification on the 2-core machine (README, "Edit jobs"); one thread
    /// keeps the edit beside inference instead of against it.
    #[arg(long, env = "EDITSERVE_EDIT_THREADS", default_value_t = std::num::NonZeroUsize::MIN)]
    pub edit_threads: std::num::NonZeroUsize,
    /// Natural photos (`statistics/` and `check/`, disjoint): the default statistics of every edit that
    /// names none, and the default check set of the breakage guard. `make setup` fetches them.
    #[arg(long, env = "EDITSERVE_NATURAL_PHOTOS_DIR", default_value = "data/natural")]
    pub natural_photos_dir: PathBuf,
    /// Where default statistics are cached (keyed by the weights, layer, parent's changes before the layer,
    /// preprocessing and photos, so servers and data directories can share it).
    #[arg(long, env = "EDITSERVE_STATISTICS_CACHE_DIR", default_value = "data/statistics-cache")]
    pub statistics_cache_dir: PathBuf,
    /// A directory whose subdirectories statistics jobs may read images from, by name.
    #[arg(long, env = "EDITSERVE_STATISTICS_DIR")]
    pub statistics_dir: Option<PathBuf>,
    /// A directory whose subdirectories dataset uploads may name instead of sending the images.
    #[arg(long, env = "EDITSERVE_DATASETS_DIR")]
    pub datasets_dir: Option<PathBuf>,
    /// Most images (pairs, for a pairs dataset) in one dataset.
    #[arg(long, env = "EDITSERVE_MAX_DATASET_IMAGES", default_value_t = DEFAULT_MAX_DATASET_IMAGES)]
    pub max_dataset_images: usize,
    /// Largest dataset upload (and most bytes a directory dataset reads), in bytes: a dataset is many
    /// images in one request, so `POST /v1/datasets` has this limit instead of --max-body-bytes.
    #[arg(long, env = "EDITSERVE_MAX_DATASET_BYTES", default_value_t = DEFAULT_MAX_DATASET_BYTES)]
    pub max_dataset_bytes: usize,
    /// A file of bearer tokens, one `NAME SCOPES SECRET` per line (scopes `infer`, `edit`, `admin`; the secret
    /// itself or `sha256:<hex>`). Without tokens (this and EDITSERVE_TOKENS unset) only loopback clients are
    /// served.
    #[arg(long, env = "EDITSERVE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Tokens in the file's format (`;` may end an entry), instead of or beside --tokens-file.
    #[arg(long, env = "EDITSERVE_TOKENS", hide_env_values = true)]
    pub tokens: Option<String>,
    /// Requests one token may have in flight (an event stream counts while it lasts); beyond, 429.
    #[arg(long, env = "EDITSERVE_MAX_CONCURRENT_PER_TOKEN", default_value_t = 64)]
    pub max_concurrent_per_token: usize,
    /// `/metrics` wants a token too (any configured one); `/healthz`, `/readyz` and the docs stay open.
    #[arg(long, env = "EDITSERVE_PROTECT_METRICS")]
    pub protect_metrics: bool,
}

impl ServeConfig {
    pub fn batching(&self, device: tch::Device) -> BatchingConfig {
        let one = std::num::NonZeroUsize::MIN;
        let (default_batch, default_streams, default_threads) = if device.is_cuda() {
            (64, one, None)
        } else {
            (2, std::thread::available_parallelism().unwrap_or(one), Some(one))
        };
        BatchingConfig {
            max_batch_size: self.max_batch_size.unwrap_or(default_batch).max(1),
            max_batch_wait: Duration::from_millis(self.max_batch_wait_ms),
            queue_capacity: self.queue_capacity.max(1),
            streams: self.inference_streams.unwrap_or(default_streams),
            threads_per_stream: self.inference_threads.or(default_threads),
        }
    }

    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits { max_pixels: self.max_pixels }
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceChoice;

    #[test]
    fn parses_devices() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cuda:1".parse(), Ok(DeviceChoice::Cuda(1)));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
    }
}
