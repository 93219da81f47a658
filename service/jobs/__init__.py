"""Training jobs: the runner (in-process or fed by the SQS worker tier), a job's child process, the queue."""
