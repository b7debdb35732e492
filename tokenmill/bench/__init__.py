"""`tokenmill bench`: a load generator for any OpenAI-compatible server, in the manner of `vllm
bench serve`: a workload of chat requests, run closed-loop at concurrency levels or open-loop at
Poisson request rates, against tokenmill and the servers it is compared with, interleaved in one
run; throughput and latency (TTFT, TPOT, ITL) per target and level, written as JSON."""
