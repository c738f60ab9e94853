//! Who a piece of work is done for, as the audit log records it: the transport names the caller around each
//! request it serves (a token's name), and everything the request does in that task sees it.

use std::future::Future;

tokio::task_local! {
    static CALLER: String;
}

/// The caller when the transport named none (no tokens configured, or work the server does on its own).
pub const ANONYMOUS: &str = "anonymous";

/// Runs `work` on behalf of `name`.
pub async fn scope<F: Future>(name: String, work: F) -> F::Output {
    CALLER.scope(name, work).await
}

/// The caller of the work this task does.
pub fn current() -> String {
    CALLER.try_with(Clone::clone).unwrap_or_else(|_| ANONYMOUS.to_string())
}
