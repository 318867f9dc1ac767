//! The control socket's language, spoken by the agent and by `lbs status`, `lbs promote`,
//! `lbs demote`, `lbs reload` and `lbs console`.

/// Where the control socket lives unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lbs/agent.sock";
