//! qoq-eval (work in progress).
