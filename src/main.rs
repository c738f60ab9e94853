use clap::{Parser, Subcommand};

use editserve::config::ServeConfig;

#[derive(Parser)]
#[command(name = "editserve", version, about = "Serve and edit image classifiers over HTTP")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(ServeConfig),
    /// Edit a model offline from exemplars and write the change (a delta) to a file.
    Edit(editserve::cli::EditArgs),
    /// Classify images with a model package, optionally with a delta applied.
    Classify(editserve::cli::ClassifyArgs),
    /// Make a model package of a torchvision checkpoint (.pth or .safetensors) and a labels file.
    Import(editserve::cli::ImportArgs),
    /// Print the HTTP API's OpenAPI document (YAML); `openapi.yaml` is its output.
    Openapi,
}

fn main() -> anyhow::Result<()> {
    let malloc_tuned = editserve::alloc::tune_from_env();
    let cli = Cli::parse();
    if let Command::Openapi = cli.command {
        print!("{}", editserve::api::openapi().to_yaml()?);
        return Ok(());
    }
    editserve::telemetry::init_logging();
    tracing::info!(malloc_tuned, "starting");
    match cli.command {
        Command::Serve(config) => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(editserve::server::run(config))
        }
        Command::Edit(args) => editserve::cli::run_edit(args),
        Command::Classify(args) => editserve::cli::run_classify(args),
        Command::Import(args) => editserve::cli::run_import(args),
        Command::Openapi => Ok(()),
    }
}
