//! What every Switchyard program starts with: logging to stderr, filtered by `SWITCHYARD_LOG`, and an
//! async runtime for its main future.

/// Starts logging with `default_filter` unless `SWITCHYARD_LOG` gives another; JSON lines when `json`.
pub fn init(default_filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs a program's main future: on this thread alone (`workers` None) or on that many worker threads.
/// The error is the runtime's own, when it cannot start.
pub fn block_on<F: std::future::Future>(
    workers: Option<usize>,
    future: F,
) -> std::io::Result<F::Output> {
    let mut builder = match workers {
        None => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    Ok(builder.enable_all().build()?.block_on(future))
}
