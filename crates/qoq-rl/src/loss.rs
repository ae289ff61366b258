//! Policy loss (work in progress).
