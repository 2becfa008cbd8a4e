//! Flotilla init: PID 1 of the host and the unit manager, with its D-Bus control API.
//!
//! As PID 1, [`boot`] sets the machine up first and takes it down last.
//! Layout: [`manager`] owns unit state; [`event_loop`] feeds it signals, requests, output and
//! time; [`launcher`] creates a unit's process (the container runtime's seam); [`scope`]
//! tracks a unit's processes (cgroup v2); [`logs`] captures output; [`api`] is the control
//! interface (D-Bus server and client).

pub mod api;
pub mod boot;
pub mod event_loop;
pub mod launcher;
pub mod logs;
pub mod manager;
pub mod os_update;
pub mod provision;
pub mod scope;
pub mod toolbox;
pub mod trial;
