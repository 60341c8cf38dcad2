//! End-to-end tests: the real `edgecase` binary against the real Mosquitto and RabbitMQ.
