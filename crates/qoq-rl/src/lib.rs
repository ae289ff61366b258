//! qoq-rl (work in progress).
