//! ECG-JEPA encoder (work in progress).
