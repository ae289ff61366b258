//! The run folder's guards: a lock that keeps a second training process out of an `out_dir`
//! ([`RunLock`]), and the fingerprints of the manifests a run trained on
//! ([`DataFingerprint`]), saved with every checkpoint so that a resume notices changed data.

use crate::checkpoint::{CheckpointError, sha256_file};
use qoq_data::manifest::{Manifest, RowOrder};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Name of the lock file inside the run folder.
pub const LOCK_FILE: &str = "train.lock";
/// Name of the run's event log inside the run folder (JSON lines: lock take-overs, resumes on
/// changed data).
pub const EVENTS_FILE: &str = "events.jsonl";

/// Errors of the run-folder guards.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// Another live process holds the run folder.
    #[error(
        "{dir} is in use by another training process: pid {pid} on host {host}, started {started} \
         (lock file {lock}); wait for it to finish or give another trainer.out_dir{hint}",
        dir = dir.display(),
        pid = owner.pid,
        host = owner.host,
        started = owner.started,
        lock = lock.display(),
        hint = if owner.host != this_host() {
            "; the process runs on another host, so its liveness cannot be checked here: remove \
             the lock file by hand if it is gone"
        } else {
            ""
        }
    )]
    Busy {
        /// The run folder.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// Who holds it.
        owner: LockOwner,
    },
    /// A file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The lock file is not a lock this program wrote.
    #[error(
        "{path}: not a training lock ({message}); remove it if no training runs in this folder"
    )]
    BadLock {
        /// The lock file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The process that holds a run folder, as its lock file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockOwner {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// Start of the lock, UTC (`YYYY-MM-DDTHH:MM:SSZ`).
    pub started: String,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22), which
    /// tells a live owner from a later process that reuses its pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_start: Option<u64>,
}

impl LockOwner {
    /// This process.
    fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            host: this_host(),
            started: utc_now(),
            proc_start: proc_stat(pid).map(|(_, start)| start),
        }
    }

    /// Whether the owner may still be running: false only when it ran on this host and its pid
    /// is gone, a zombie, or now another process.
    pub fn may_be_alive(&self) -> bool {
        if self.host != this_host() || !Path::new("/proc/self/stat").exists() {
            return true;
        }
        match proc_stat(self.pid) {
            None => false,
            Some((state, start)) => {
                !matches!(state, 'Z' | 'X' | 'x') && self.proc_start.is_none_or(|s| s == start)
            }
        }
    }
}

/// The exclusive hold of one process on a run folder, released on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    owner: LockOwner,
    taken_over: Option<LockOwner>,
}

impl RunLock {
    /// Locks `dir` (created if needed) for this process. A lock left by a process that is no
    /// longer running (killed runs) is taken over and the take-over recorded in
    /// [`EVENTS_FILE`]; a live owner's lock is [`RunDirError::Busy`], naming it.
    pub fn acquire(dir: &Path) -> Result<Self, RunDirError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RunDirError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let owner = LockOwner::current();
        let text = serde_json::to_string(&owner).expect("a lock owner serialises");
        let mut taken_over = None;
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(text.as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(io(&path))?;
                    let lock = Self {
                        path,
                        owner,
                        taken_over,
                    };
                    if let Some(old) = &lock.taken_over {
                        append_event(
                            dir,
                            &serde_json::json!({
                                "event": "stale_lock_taken_over",
                                "time": utc_now(),
                                "stale_owner": old,
                                "owner": lock.owner,
                            }),
                        )?;
                    }
                    return Ok(lock);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let held = read_owner(&path)?;
                    if held.may_be_alive() {
                        return Err(RunDirError::Busy {
                            dir: dir.to_path_buf(),
                            lock: path,
                            owner: held,
                        });
                    }
                    tracing::warn!(
                        pid = held.pid,
                        host = %held.host,
                        started = %held.started,
                        "taking over the stale lock of a training process that is gone"
                    );
                    std::fs::remove_file(&path).map_err(io(&path))?;
                    taken_over = Some(held);
                }
                Err(e) => return Err(io(&path)(e)),
            }
        }
        // A third process took the stale lock between our removal and creation.
        Err(RunDirError::Busy {
            dir: dir.to_path_buf(),
            owner: read_owner(&path)?,
            lock: path,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This process, as the lock records it.
    pub fn owner(&self) -> &LockOwner {
        &self.owner
    }

    /// The owner of the stale lock this one replaced, if any.
    pub fn taken_over(&self) -> Option<&LockOwner> {
        self.taken_over.as_ref()
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Remove the file only while it is still ours.
        if read_owner(&self.path).is_ok_and(|o| o == self.owner) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn read_owner(path: &Path) -> Result<LockOwner, RunDirError> {
    let text = std::fs::read_to_string(path).map_err(|source| RunDirError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| RunDirError::BadLock {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Appends one JSON line to `<dir>/events.jsonl`.
pub fn append_event(dir: &Path, event: &serde_json::Value) -> Result<(), RunDirError> {
    use std::io::Write;
    let path = dir.join(EVENTS_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{event}"))
        .map_err(|source| RunDirError::Io { path, source })
}

/// `(state, start time in ticks)` of a process from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// This machine's host name.
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Now, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(secs)
}

/// A Unix time as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian calendar).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What a checkpoint records of one manifest it trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFingerprint {
    /// `train` (`data.train_files`) or `val` (`data.val_files`).
    pub role: String,
    /// The manifest path as configured.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Rows (samples) in it.
    pub rows: u64,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// The training stream's row order (`data.preshuffle_seed`, `data.shuffle`); absent in
    /// checkpoints written before it was recorded (then not compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<RowOrder>,
}

impl DataFingerprint {
    /// The fingerprint of an open manifest.
    pub fn of(role: &str, manifest: &Manifest) -> Result<Self, CheckpointError> {
        let (size, sha256) = sha256_file(manifest.path())?;
        Ok(Self {
            role: role.into(),
            path: manifest.path().display().to_string(),
            size,
            rows: manifest.len() as u64,
            sha256,
            order: Some(manifest.row_order()),
        })
    }

    /// What differs from `now` (empty when nothing does), e.g. `rows 455 → 100`.
    pub fn changes(&self, now: &Self) -> Vec<String> {
        let mut out = Vec::new();
        if self.path != now.path {
            out.push(format!("path {} → {}", self.path, now.path));
        }
        if self.rows != now.rows {
            out.push(format!("rows {} → {}", self.rows, now.rows));
        }
        if self.size != now.size {
            out.push(format!("size {} → {} bytes", self.size, now.size));
        }
        if let (Some(a), Some(b)) = (self.order, now.order)
            && a != b
        {
            let show = |o: RowOrder| {
                format!(
                    "preshuffle_seed {}, shuffle {}",
                    o.preshuffle_seed
                        .map_or_else(|| "none".to_string(), |s| s.to_string()),
                    o.shuffle
                )
            };
            out.push(format!("row order ({} → {})", show(a), show(b)));
        }
        if self.sha256 != now.sha256 {
            out.push(format!(
                "sha256 {} → {}",
                &self.sha256[..self.sha256.len().min(12)],
                &now.sha256[..now.sha256.len().min(12)]
            ));
        }
        out
    }
}

/// The changes between the fingerprints a checkpoint saved and the current ones, one line per
/// changed manifest (`train manifest x.jsonl: rows 455 → 100, ...`). Manifests the checkpoint
/// did not record (older checkpoints) are not compared.
pub fn data_changes(saved: &[DataFingerprint], now: &[DataFingerprint]) -> Vec<String> {
    let mut out = Vec::new();
    for s in saved {
        if let Some(n) = now.iter().find(|n| n.role == s.role) {
            let c = s.changes(n);
            if !c.is_empty() {
                out.push(format!("{} manifest {}: {}", s.role, n.path, c.join(", ")));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_follow_the_calendar() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_400_000 + 3_723), "2026-12-04T17:02:03Z");
    }

    #[test]
    fn a_live_lock_is_refused_naming_its_owner_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        assert!(lock.taken_over().is_none());
        let err = RunLock::acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, RunDirError::Busy { .. }), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains(&this_host()),
            "{msg}"
        );
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        RunLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_stale_lock_is_taken_over_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        // A process that has exited (and been reaped): its pid is gone or reused.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let stale = LockOwner {
            pid,
            host: this_host(),
            started: "2026-01-01T00:00:00Z".into(),
            proc_start: Some(u64::MAX),
        };
        assert!(!stale.may_be_alive());
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_string(&stale).unwrap(),
        )
        .unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.taken_over(), Some(&stale));
        let events = std::fs::read_to_string(dir.path().join(EVENTS_FILE)).unwrap();
        assert!(events.contains("stale_lock_taken_over"), "{events}");
        // This process is alive: its own record is.
        assert!(lock.owner().may_be_alive());
    }

    #[test]
    fn fingerprint_changes_name_what_changed() {
        let a = DataFingerprint {
            role: "train".into(),
            path: "t.jsonl".into(),
            size: 1000,
            rows: 455,
            sha256: "a".repeat(64),
            order: Some(RowOrder::default()),
        };
        let mut b = a.clone();
        assert!(data_changes(std::slice::from_ref(&a), std::slice::from_ref(&b)).is_empty());
        b.rows = 100;
        b.size = 200;
        b.sha256 = "b".repeat(64);
        let c = data_changes(std::slice::from_ref(&a), &[b]);
        assert_eq!(c.len(), 1);
        assert!(
            c[0].contains("rows 455 → 100") && c[0].contains("size 1000 → 200 bytes"),
            "{c:?}"
        );
        // Another pre-shuffle seed is a change of the training order.
        let mut d = a.clone();
        d.order = Some(RowOrder {
            preshuffle_seed: Some(42),
            shuffle: false,
        });
        let c = data_changes(std::slice::from_ref(&a), &[d.clone()]);
        assert!(
            c[0].contains(
                "row order (preshuffle_seed none, shuffle true → preshuffle_seed 42, shuffle false)"
            ),
            "{c:?}"
        );
        // A checkpoint that did not record the order is not compared on it.
        let mut old = a.clone();
        old.order = None;
        assert!(data_changes(&[old], &[d]).is_empty());
    }
}
