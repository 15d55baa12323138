//! One operation at a time per volume: the kubelet and the sidecars retry every call, often
//! while the first attempt still runs. A second call on a busy volume is answered ABORTED
//! at once (the CSI specification's "operation pending for volume"), and its caller retries
//! later, instead of both racing on the same folder, device or mount.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use tonic::Status;

/// The set of volumes with an operation in progress.
#[derive(Debug, Default, Clone)]
pub struct OpLocks(Arc<Mutex<HashSet<String>>>);

/// Held while an operation on one volume runs; released on drop.
#[derive(Debug)]
pub struct OpGuard {
    locks: OpLocks,
    key: String,
}

impl OpLocks {
    /// Claims `key` for an operation, or refuses with ABORTED when another one holds it.
    pub fn claim(&self, key: &str, what: &str) -> Result<OpGuard, Status> {
        if !self.0.lock().insert(key.to_string()) {
            return Err(Status::aborted(format!(
                "another operation on volume {key} is in progress; {what} will be retried"
            )));
        }
        Ok(OpGuard {
            locks: self.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.locks.0.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_aborted_until_the_first_ends() {
        let l = OpLocks::default();
        let g = l.claim("a", "stage").expect("first");
        assert_eq!(
            l.claim("a", "stage").expect_err("second").code(),
            tonic::Code::Aborted
        );
        l.claim("b", "stage").expect("other volume");
        drop(g);
        l.claim("a", "stage").expect("after release");
    }
}
