# PLACEHOLDER: this image is not finished yet (issue 5 completes it: CUDA base, non-root
# user, data/results/checkpoints volumes, `make reproduce`). It is not tested in CI yet.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -c constraints.txt -e .
ENTRYPOINT ["harness"]
