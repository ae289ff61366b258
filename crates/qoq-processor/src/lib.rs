//! qoq-processor (work in progress).
