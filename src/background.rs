//! Upkeep work that can wait: de-dup merges and summary filter steps, each
//! run on a thread of its own at a lower scheduling priority.
//!
//! Owns: the thread and its priority. Must not: run work a request waits on.
//! At full rate the node's pipeline (actor thread, commit thread, request
//! workers) leaves part of the cores idle between batches; upkeep at the same
//! priority took its turns from them instead, and the rate dipped while a
//! large merge or a summary rebuild ran (docs/BENCHMARKS.md, "upkeep behind
//! ingest").

/// The nice value upkeep threads take (0 is the default, 19 the lowest):
/// against ingest's threads they get about a tenth of a core when both want
/// one, and every idle moment.
const UPKEEP_NICE: i32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    #[error("no upkeep thread could be started: {0}")]
    Spawn(String),
    #[error("the upkeep thread ended without a result")]
    Lost,
}

/// Runs `work` on a new thread named `name` at `UPKEEP_NICE` and waits for
/// its result without holding a runtime thread.
pub async fn run_behind<T, Work>(name: &str, work: Work) -> Result<T, BackgroundError>
where
    T: Send + 'static,
    Work: FnOnce() -> T + Send + 'static,
{
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lower_priority();
            let _ = sender.send(work());
        })
        .map_err(|error| BackgroundError::Spawn(error.to_string()))?;
    receiver.await.map_err(|_| BackgroundError::Lost)
}

/// Lowers the calling thread's priority (on Linux a thread has its own nice
/// value). A refusal leaves it at the default: slower ingest, nothing lost.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read and set this thread's
    // scheduling priority; raising the nice value needs no privilege.
    unsafe {
        let thread = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, thread as libc::id_t, UPKEEP_NICE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upkeep_runs_on_a_thread_of_its_own_at_a_lower_priority() {
        let (name, nice) = run_behind("tally-test-upkeep", || {
            let name = std::thread::current().name().map(str::to_string);
            // SAFETY: reads this thread's priority only
            let nice =
                unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
            (name, nice)
        })
        .await
        .unwrap();
        assert_eq!(name.as_deref(), Some("tally-test-upkeep"));
        assert_eq!(nice, UPKEEP_NICE);
    }
}
