import sys

from diffusion_np.cli import main

sys.exit(main())
