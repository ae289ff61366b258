//! The CPU thread count of candle's kernels, fixed once per process.
//!
//! candle 0.11's CPU matmul asks `candle_core::utils::get_num_threads()` for its thread count on
//! every call, and without `RAYON_NUM_THREADS` that function counts the physical cores by opening
//! and parsing `/proc/cpuinfo` (`num_cpus::get_physical`), uncached. For the small matrices of
//! decoding, ECG and tiny models that parse costs more than the product itself: a `qoq serve`
//! decode step of the tiny model spent most of its time in it (13,000 opens of `/proc/cpuinfo` in
//! a 16-request run, `strace -f -e openat`). Setting the variable to the value candle would
//! compute makes the call a cheap environment read and changes no thread count.

/// The environment variable candle (and rayon) read for the thread count.
pub const THREADS_VAR: &str = "RAYON_NUM_THREADS";

/// Set [`THREADS_VAR`] to candle's own default when the user has not set it (a positive value
/// they set is kept; an empty, zero or malformed one is replaced, as candle would ignore it).
/// Returns the thread count in effect.
///
/// # Safety
/// Changes the process environment: call it at the start of `main`, before any other thread
/// exists (a thread reading the environment at the same time would be undefined behaviour).
#[allow(unsafe_code)] // std::env::set_var is unsafe in edition 2024; see # Safety
pub unsafe fn pin_thread_count() -> usize {
    if let Some(n) = std::env::var(THREADS_VAR)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    // Without the variable, this is candle's default (one /proc/cpuinfo parse, here only).
    let n = candle_core::utils::get_num_threads().max(1);
    // SAFETY: the caller guarantees no other thread runs (see the function's contract).
    unsafe { std::env::set_var(THREADS_VAR, n.to_string()) };
    n
}

/// Stack of each compute thread: the commands run on one (see [`install`]), and candle's
/// backward recurses over the graph (the test configuration's `RUST_MIN_STACK`, against the
/// 8 MiB of a main thread and rayon's default 2 MiB). Address space only until touched.
const STACK_BYTES: usize = 64 << 20;

/// The process's compute threads (rayon's pool of [`pin_thread_count`]'s size), built on first
/// use; `None` where the threads could not be started.
static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();

/// Runs `f` on one of the process's compute threads and returns its result; directly when
/// called on one already (or where the threads could not be started).
///
/// Every parallel kernel (candle's and the `gemm` crate's products, this crate's fused ops) is
/// a rayon job. Called from a thread outside the pool, such as `main`, each one is handed to a
/// pool thread while the caller sleeps until it is done: a wake-up and a sleep per kernel, and
/// a training step runs thousands. Called from a pool thread, the caller runs its share of the
/// job and the other threads steal the rest. A tiny model's RL step, ours only, alternated four
/// times: 0.589 / 0.574 / 0.583 / 0.564 s on the main thread, 0.480 / 0.471 / 0.469 / 0.459 s
/// inside (`qoq bench train-step --size tiny --steps 9 --no-reference`); the same values.
/// Threads that hand the pool work (the CLI's `main`, the server's scheduler) call this once
/// around their work.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(candle_core::utils::get_num_threads().max(1))
            .stack_size(STACK_BYTES)
            .thread_name(|i| format!("qoq-compute-{i}"))
            .build()
            .map_err(|e| tracing::warn!("compute threads not started ({e}): running on the caller"))
            .ok()
    });
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_runs_on_a_compute_thread_of_the_pinned_count() {
        let (name, index, n) = install(|| {
            (
                std::thread::current().name().map(String::from),
                rayon::current_thread_index(),
                rayon::current_num_threads(),
            )
        });
        assert!(name.unwrap_or_default().starts_with("qoq-compute-"));
        assert!(index.is_some());
        assert_eq!(n, candle_core::utils::get_num_threads().max(1));
        // Nested: runs on the thread it is called from.
        let (outer, inner) = install(|| {
            (
                rayon::current_thread_index(),
                install(rayon::current_thread_index),
            )
        });
        assert!(outer.is_some());
        assert_eq!(outer, inner);
    }

    /// The variable is set to candle's default, after which candle answers the same count
    /// from the environment; a positive user value is kept, zero replaced. The environment is
    /// changed only in a child process running this test alone (`cargo test` runs other tests,
    /// which read the variable through candle, on threads of this one).
    #[test]
    #[allow(unsafe_code)] // environment writes, see the SAFETY note
    fn pins_candles_default_and_keeps_a_user_value() {
        const CHILD: &str = "QOQ_THREADS_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "threads::tests::pins_candles_default_and_keeps_a_user_value",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .env_remove(THREADS_VAR)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("1 passed"), "the child ran no test: {text}");
            return;
        }
        // SAFETY: this child process runs this test alone, on one thread.
        unsafe {
            let default = candle_core::utils::get_num_threads();
            assert_eq!(pin_thread_count(), default);
            assert_eq!(std::env::var(THREADS_VAR).unwrap(), default.to_string());
            assert_eq!(candle_core::utils::get_num_threads(), default);
            std::env::set_var(THREADS_VAR, "3");
            assert_eq!(pin_thread_count(), 3);
            assert_eq!(candle_core::utils::get_num_threads(), 3);
            std::env::set_var(THREADS_VAR, "0");
            assert_eq!(pin_thread_count(), default);
        }
    }
}
