//! Outputs: the buffer drains to AMQP (or, for the demo, to an in-process queue). Rows
//! leave the buffer only after the output took them.

pub mod amqp;
pub mod memory;
