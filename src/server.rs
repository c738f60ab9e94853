//! Wires the layers together for `editserve serve`: device worker, registry, HTTP server, shutdown.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::Router;
use tokio::net::TcpListener;

use crate::api::{router, AppState, Tokens};
use crate::config::ServeConfig;
use crate::core::cpu_pool::CpuPool;
use crate::core::datasets::Datasets;
use crate::core::edit_worker::{EditWorker, NaturalPhotos};
use crate::core::evaluations::Evaluations;
use crate::core::exemplars::Exemplars;
use crate::core::jobs::Jobs;
use crate::core::registry::{discover_packages, Registry};
use crate::core::scheduler::{DeviceWorker, EditActivity};
use crate::core::versions::Versions;
use crate::core::CoreError;
use crate::models::ModelPackage;
use crate::store::{BlobStore, FsBlobStore, MetadataStore, SqliteStore};
use crate::telemetry;

/// The service built from its configuration, before it listens: the router, and what start-up and shutdown
/// act on. `editserve serve` runs it on a socket; tests can drive `router` in-process.
pub struct App {
    pub router: Router,
    pub device: tch::Device,
    registry: Arc<Registry>,
    versions: Arc<Versions>,
    jobs: Arc<Jobs>,
    packages: Vec<PathBuf>,
    /// Set at shutdown: event streams follow jobs that may run for minutes, and must end for draining.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl App {
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        if config.max_images_in_flight < config.max_images_per_request {
            bail!("--max-images-in-flight must be at least --max-images-per-request: one request must fit");
        }
        let tokens = load_tokens(&config)?;
        let metrics = telemetry::prometheus().map_err(anyhow::Error::msg)?;
        let device = config.device.resolve().map_err(anyhow::Error::msg)?;
        let packages = selected_packages(&config)?;
        let batching = config.batching(device);
        let edits = EditActivity::default();
        let worker = DeviceWorker::spawn(device, batching, config.max_resident_versions, Arc::clone(&edits))?;
        let cpu_pool = Arc::new(CpuPool::new(available_cores(), batching.queue_capacity)?);
        let registry =
            Arc::new(Registry::new(worker, Arc::clone(&cpu_pool), config.decode_limits(), config.max_images_in_flight));
        let metadata: Arc<dyn MetadataStore> =
            Arc::new(SqliteStore::open(&config.data_dir.join("editserve.db")).await.context("opening the database")?);
        let blobs: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(&config.data_dir.join("blobs"))?);
        // Nothing writes yet: blobs of deleted versions and exemplars, and any a crash left behind, can go.
        let (swept, swept_bytes) = blobs.sweep(&metadata.referenced_blobs().await?).await?;
        if swept > 0 {
            tracing::info!(blobs = swept, bytes = swept_bytes, "removed blobs nothing refers to");
        }
        let exemplars =
            Exemplars::new(Arc::clone(&metadata), Arc::clone(&blobs), Arc::clone(&cpu_pool), config.decode_limits());
        let datasets = Arc::new(Datasets::new(
            Arc::clone(&metadata),
            Arc::clone(&blobs),
            cpu_pool,
            config.decode_limits(),
            config.datasets_dir.clone(),
            config.max_dataset_images,
            config.max_dataset_bytes,
        ));
        let versions = Arc::new(Versions::new(Arc::clone(&registry), Arc::clone(&metadata), Arc::clone(&blobs)));
        let jobs = Jobs::start(
            Arc::clone(&registry),
            Arc::clone(&versions),
            Arc::clone(&metadata),
            blobs,
            EditWorker::spawn(
                device,
                config.decode_limits(),
                config.edit_threads,
                NaturalPhotos {
                    dir: config.natural_photos_dir.clone(),
                    cache_dir: config.statistics_cache_dir.clone(),
                },
                edits,
            )?,
            config.edit_queue_capacity,
            config.statistics_dir.clone(),
        )
        .await?;
        let evaluations = Evaluations::new(Arc::clone(&registry), Arc::clone(&versions), Arc::clone(&jobs), metadata);
        let stopping = tokio::sync::watch::Sender::new(false);
        let state = Arc::new(AppState {
            stopping: stopping.subscribe(),
            registry: Arc::clone(&registry),
            exemplars,
            versions: Arc::clone(&versions),
            jobs: Arc::clone(&jobs),
            datasets,
            evaluations,
            config,
            metrics,
        });
        Ok(Self { router: router(state, tokens), device, registry, versions, jobs, packages, stopping })
    }

    /// Loads the selected packages (until then /readyz answers 503).
    pub async fn load_models(&self) -> Result<(), CoreError> {
        load_models(&self.registry, &self.versions, &self.packages).await
    }

    /// Ends the event streams and lets the running job finish (the queued ones run after a restart).
    pub async fn stop(&self) {
        self.stopping.send_replace(true);
        self.jobs.stop().await;
    }
}

/// The tokens of --tokens-file and EDITSERVE_TOKENS together; None when neither is set.
fn load_tokens(config: &ServeConfig) -> anyhow::Result<Option<Tokens>> {
    let mut text = match &config.tokens_file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading the tokens file {}", path.display()))?
        }
        None => String::new(),
    };
    if let Some(inline) = &config.tokens {
        text.push('\n');
        text.push_str(inline);
    }
    if config.tokens_file.is_none() && config.tokens.is_none() {
        let exposed =
            if config.listen.ip().is_loopback() { "" } else { " (other peers reaching this address are refused)" };
        tracing::warn!("no tokens configured: only loopback clients are served{exposed}; see --tokens-file");
        return Ok(None);
    }
    let tokens = Tokens::parse(&text).map_err(|e| anyhow::anyhow!("tokens: {e}"))?;
    tracing::info!(tokens = tokens.len(), "bearer tokens configured");
    Ok(Some(tokens))
}

pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let listen = config.listen;
    let header_timeout = std::time::Duration::from_secs(config.header_timeout_secs);
    let app = App::build(config).await?;
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, device = ?app.device, "listening");
    let stopping = app.stopping.clone();
    let server = serve_connections(listener, app.router.clone(), header_timeout, async move {
        shutdown_signal().await;
        stopping.send_replace(true);
    });
    let mut server = std::pin::pin!(server);
    // Serve /healthz and a 503 /readyz while the models load; a model that fails to load stops the server.
    tokio::select! {
        loaded = app.load_models() => {
            loaded.context("loading models")?;
            tracing::info!(models = app.packages.len(), "ready");
        }
        served = &mut server => return served.context("server failed"),
    }
    server.await.context("server failed")?;
    app.stop().await;
    tracing::info!("drained in-flight requests; stopping");
    Ok(())
}

/// Accepts connections until `shutdown`, then lets each finish what it is answering (idle ones close) and
/// waits for them. Each request carries its peer's address (`ConnectInfo`). A client gets
/// `header_timeout` to send a request's head, also on a kept-alive connection waiting for its next
/// request, so silent and slow-header connections do not pile up.
async fn serve_connections(
    listener: TcpListener,
    router: Router,
    header_timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    // HTTP/1 only: protocol detection would wait for a silent client's first bytes with no timeout.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            tower::ServiceExt::oneshot(router.clone(), request.map(axum::body::Body::new))
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Loads the packages, each under its own name and only on the weights its name's versions were made on,
/// then marks the server ready.
async fn load_models(registry: &Registry, versions: &Versions, packages: &[PathBuf]) -> Result<(), CoreError> {
    for dir in packages {
        let name = ModelPackage::open(dir)?.name;
        versions.load_model(&name, dir).await?;
    }
    registry.mark_ready();
    Ok(())
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn selected_packages(config: &ServeConfig) -> anyhow::Result<Vec<PathBuf>> {
    let found = discover_packages(&config.models_dir)?;
    let chosen: Vec<PathBuf> = if config.models.is_empty() {
        found
    } else {
        config.models.iter().map(|name| config.models_dir.join(name)).collect()
    };
    if chosen.is_empty() {
        bail!("no model packages in {}: run `make setup` first", config.models_dir.display());
    }
    Ok(chosen)
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; draining");
}
