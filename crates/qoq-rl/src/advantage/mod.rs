//! Advantage estimators (work in progress).
