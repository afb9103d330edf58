"""The whole farm on one machine, for the demo, development and tests: a redis-server, an S3 server
(moto) and worker processes, each a child process."""
