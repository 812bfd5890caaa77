from mae_transfer.cli import main

raise SystemExit(main())
