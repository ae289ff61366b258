//! qoq-model (work in progress).
