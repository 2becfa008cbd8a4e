//! The image store (being written).
