//! Connecting to the configured backend: the one place that matches on the backend kind.

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "valkey"))]
use std::sync::Arc;

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "valkey"))]
use super::groups::GroupStore;
use super::lazy::{Connected, LazySource};
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "valkey"))]
use super::seam::CompletionSource;
use crate::config::BackendConfig;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "valkey"))]
use crate::config::BackendConnection;
use crate::error::Error;

/// The configured backend, connected on first use (see [`super::lazy`]).
pub(crate) fn lazy_source(config: &BackendConfig) -> LazySource {
    let config = config.clone();
    LazySource::new(
        config.kind(),
        Box::new(move || {
            let config = config.clone();
            Box::pin(async move { open_source(&config).await })
        }),
    )
}

/// Connects to the configured backend (installing its schema or function library).
///
/// # Errors
/// [`Error::Validation`] for a backend compiled out or a bad config; connection
/// errors as [`Error::Unavailable`] or [`Error::Transport`].
pub(crate) async fn open_source(config: &BackendConfig) -> Result<Connected, Error> {
    match &config.connection {
        #[cfg(feature = "postgres")]
        BackendConnection::Postgres(_) => Ok(both(super::postgres::PostgresSource::connect(config).await?)),
        #[cfg(feature = "sqlite")]
        BackendConnection::Sqlite(_) => Ok(both(super::sqlite::SqliteSource::connect(config).await?)),
        #[cfg(feature = "valkey")]
        BackendConnection::Valkey(_) => Ok(both(super::valkey::ValkeySource::connect(config).await?)),
        #[allow(unreachable_patterns)]
        _ => Err(Error::validation(format!(
            "backend {} is not compiled in (enable the cargo feature {:?})",
            config,
            config.kind()
        ))),
    }
}

/// A backend whose source is also its group store.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "valkey"))]
fn both<S: CompletionSource + GroupStore>(source: S) -> Connected {
    let source = Arc::new(source);
    Connected { source: source.clone(), groups: Some(source) }
}
