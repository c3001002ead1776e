from reft_jax.main import run

run()
