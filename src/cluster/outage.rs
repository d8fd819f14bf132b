//! A registry outage, logged once when it starts and once when it ends.

use std::sync::Mutex;
use std::time::Instant;

use tracing::{info, warn};

use super::RegistryError;

/// Logs a registry outage once when it starts and once when it ends, however many calls fail
/// in between.
#[derive(Default)]
pub(crate) struct Outage {
    down_since: Mutex<Option<Instant>>,
}

impl Outage {
    /// A call failed: the first failure of an episode is logged.
    pub(crate) fn failed(&self, what: &str, e: &RegistryError) {
        let mut d = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            *d = Some(Instant::now());
            warn!(error = %e, "cluster registry down ({what} failed): retrying; logged again when it is back");
        }
    }

    /// A call succeeded: true if it ended an outage (which is logged).
    pub(crate) fn ok(&self) -> bool {
        let mut d = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        match d.take() {
            Some(since) => {
                info!(
                    down_ms = since.elapsed().as_millis() as u64,
                    "cluster registry back"
                );
                true
            }
            None => false,
        }
    }

    /// Passes a call's result on, noting it.
    pub(crate) fn note<T>(
        &self,
        what: &str,
        r: Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        match &r {
            Ok(_) => {
                self.ok();
            }
            Err(e) => self.failed(what, e),
        }
        r
    }
}
