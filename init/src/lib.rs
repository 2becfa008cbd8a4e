//! Flotilla init: the unit manager (supervisor mode) and its control API.

pub mod api;
