//! Outputs: the buffer drains to AMQP. Rows leave the buffer only after a confirm.

pub mod amqp;
