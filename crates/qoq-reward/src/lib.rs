//! qoq-reward (work in progress).
