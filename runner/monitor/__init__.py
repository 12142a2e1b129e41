"""What the stack is doing, read from the broker and the workers: queue depths and ages, what each
worker consumes and runs. One place for these reads, used by the `inspect`, `queues`, `purge` and
`doctor` commands, the API and the dashboard, for the embedded broker and a real Redis alike."""
