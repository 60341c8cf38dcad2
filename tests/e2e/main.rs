//! End-to-end tests: the real `edgecase` binary against the real Mosquitto and RabbitMQ.
//!
//! Each test starts `edgecase run` as a child process with its own config, data directory,
//! admin port and uniquely named topics, exchanges and queues, so tests run in parallel.
//! Tests that need RabbitMQ hold a read guard on [`harness::RABBITMQ`]; the outage test,
//! which stops RabbitMQ, holds the write guard.

mod harness;

mod binary;
mod broker_limits;
mod cases;
mod config;
mod crash;
mod db;
mod demo;
mod mqtt;
mod mqtt_link;
mod outage;
mod pushtopic;
mod python;
mod rules;
mod salesforce;
mod serial;
mod sim;
mod systemd;
