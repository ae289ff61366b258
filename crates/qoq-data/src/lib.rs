//! qoq-data (work in progress).
